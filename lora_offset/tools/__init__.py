"""The user commands that work on files, one module per command (`lora-offset <command>`)."""
