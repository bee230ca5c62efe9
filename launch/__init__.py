"""TorchX components for launching ``mdaf-rec`` jobs (see ``docs/launch.md``)."""
