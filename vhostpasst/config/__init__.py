"""Configuration: the command line, forwarding specs, host detection, one Config."""
