"""Every command's options, each declared once as a pydantic field (type, default, help, Olive alias, checks).

The CLI flags (`slmops.cli.flags`), the workflow file's keys (`slmops.workflow.reading`), the Python API
(`slmops.api`) and the flag reference (docs/cli.md) are all derived from these models, so adding an
option is one field here and adding a fine-tuning method is one `register` call in `methods`.
"""
