"""The deployment scripts' own code: flags, deploying, planning, declarative configs, the demo."""
