"""Sample documents shared by the server tests (positions in them are part of the tests)."""

WALK_MODULE = '''import os
import sys


def walk(top, depth=0):
    """Yield every path under top."""
    for name in sorted(os.listdir(top)):
        path = os.path.join(top, name)
        if os.path.isdir(path):
            yield from walk(path, depth + 1)
        yield path


def main(argv):
    count = 0
    for path in walk(argv[1]):
        count += 1
    print(count)
'''
