"""`python -m editflow.train` / `accelerate launch -m editflow.train`: the `editflow train` Hydra app
(editflow/commands/train.py). conf/config.yaml names `editflow.train.RunDirectoryCheck` as a Hydra callback."""

from editflow.commands.train import RunDirectoryCheck, main

__all__ = ["RunDirectoryCheck", "main"]

if __name__ == "__main__":
    main()
