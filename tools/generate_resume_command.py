#!/usr/bin/env python3
"""Print the `train` command that resumes from a checkpoint (same as the generate-resume-command script).

    python tools/generate_resume_command.py checkpoints/latest.pt --compare --mini-batch-size 16
"""

from train_improved.cli import resume_command_main

if __name__ == "__main__":
    resume_command_main()
