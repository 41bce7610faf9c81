"""The ``vpr-localizer`` command line (entry point :func:`vpr_localizer.cli.main.main`)."""
