import sys

from fastlm.cli import console_main

sys.exit(console_main())
