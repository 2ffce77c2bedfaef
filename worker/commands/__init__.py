"""Every ``verloop-worker`` command, one module per command (group), all on one convention.

* ``verloop-worker X`` is the click command or group ``X`` in ``worker/commands/X.py``, made
  with ``@click.command``/``@click.group`` (a group's sub-commands with ``@X.command`` in the
  same module) and added to the group by :mod:`worker.commands.main`, which holds nothing
  else. A sub-command named like a builtin gets a descriptive function name (``list_tokens``
  for ``tokens list``).
* Settings come from :func:`worker.commands.context.current_settings` (the nearest
  ``--env-file``; a command's own ``--env-file`` is passed to it); nothing reads ``ctx.obj``.
* Failures are raised as click exceptions: ``click.UsageError`` for bad usage or settings
  (exit 2), ``click.ClickException`` for a service or job that failed (exit 1), secrets
  scrubbed; ``sys.exit(code)`` only once the command has printed its own result (``check``'s
  verdict, a partial ``replay``, the exit code of ``run``'s workers).
* Helpers that are not commands: :mod:`~worker.commands.context` (settings),
  :mod:`~worker.commands.management` (jobs run for ``clients`` and ``tokens``), and
  ``X_support`` modules (what command ``X``'s sub-commands share).
"""
