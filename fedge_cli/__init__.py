"""fedge_cli"""
