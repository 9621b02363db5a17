"""The training pipeline, in data-flow order: data -> models -> networks -> noise -> losses -> step -> train."""
