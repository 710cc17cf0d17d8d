"""`accelerate launch -m editflow.preencode [overrides]`: `editflow encode` on several processes
(editflow/commands/encode.py)."""

from editflow.commands.encode import main

if __name__ == "__main__":
    main()
