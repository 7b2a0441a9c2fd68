"""adamerge training entry point: `python train.py fit --config configs/...yaml`."""
from adamerge.cli import entry

if __name__ == "__main__":
    entry()
