#!/usr/bin/env python
"""check_disk.py DIR GB: exit 1 with a one-line message unless DIR's filesystem has GB gigabytes free."""
import os
import shutil
import sys


def main(argv=None) -> int:
    path, need_gb = (argv or sys.argv[1:])[:2]
    os.makedirs(path or ".", exist_ok=True)
    free_gb = shutil.disk_usage(path or ".").free / 1e9
    if free_gb < float(need_gb):
        print(f"check_disk: {path} has {free_gb:.0f} GB free but this target needs {need_gb} GB; "
              f"free space or point the *_WORK/_DATA variables at a bigger disk", file=sys.stderr)
        return 1
    print(f"check_disk: {path} has {free_gb:.0f} GB free (needs {need_gb} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
