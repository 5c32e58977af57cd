"""A package only so that tests can import the scripts: `from tools import demo`."""
