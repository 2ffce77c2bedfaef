"""Every ``verloop-worker`` command, one module per command (group), all on one convention.

* ``verloop-worker X`` is the click command or group ``X`` in ``worker/commands/X.py``, added to
  the group by :mod:`worker.commands.main`; ``X_support`` modules hold what its sub-commands share.
* Settings come from :func:`worker.commands.context.current_settings`; nothing reads ``ctx.obj``.
* Failures are click exceptions, secrets scrubbed: ``click.UsageError`` (exit 2) for bad usage or
  settings, ``click.ClickException`` (exit 1) for a failed service or job; ``sys.exit(code)``
  only once a command has printed its own result.
"""
