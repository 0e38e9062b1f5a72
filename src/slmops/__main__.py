from slmops.cli import entry

entry()
