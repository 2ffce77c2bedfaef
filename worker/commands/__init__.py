"""Every `verloop-worker` command: one module per command group, all on one click convention."""
