"""adamerge training entry point: `python train.py fit --config configs/...yaml`."""
from adamerge.cli import main

if __name__ == "__main__":
    main()
