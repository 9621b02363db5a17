import sys

from lora_offset.cli import main

sys.exit(main())
