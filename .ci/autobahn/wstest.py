"""Launch Autobahn|Testsuite's wstest from a `pip install --target` folder.

Usage: python2 wstest.py SITE_DIR [wstest options...]

site.addsitedir (unlike PYTHONPATH) also processes the folder's .pth files,
which the zope namespace package needs.
"""
import os
import site
import sys

if len(sys.argv) < 2:
    sys.stderr.write("usage: %s SITE_DIR [wstest options...]\n" % sys.argv[0])
    sys.exit(2)

site.addsitedir(os.path.abspath(sys.argv.pop(1)))
sys.argv[0] = "wstest"

from autobahntestsuite.wstest import run  # noqa: E402  (needs the site dir first)

sys.exit(run())
