"""simulation"""

__all__ = ["DEFAULT_SIM_CODEC"]

# The best codec within 1 pp of fp32's final accuracy on digits (bench/compression). Defined
# here, not in fleet.py, so that the CLI's parser has it without importing the fleet.
DEFAULT_SIM_CODEC = "topk:0.03+int4+zstd"
