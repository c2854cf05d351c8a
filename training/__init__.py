"""What train.py and sample.py orchestrate with: options, the loop's pieces, checkpoints, logging, DDP."""
