"""What a run leaves on disk: orbax checkpoints (checkpoint) and the workdir around them."""
