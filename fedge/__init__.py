"""fedge"""
