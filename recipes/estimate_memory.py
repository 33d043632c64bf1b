"""``ftkit estimate``: per-device training memory by category, and which GPUs hold it.

    python recipes/estimate_memory.py --paper
    python recipes/estimate_memory.py --model llama2-7b --precision fp16 --quantization 4bit --gpu T4

Nothing is downloaded: presets are stored configs, a local directory needs only its config.json.
"""

import sys

from ftkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["estimate", *sys.argv[1:]]))
