"""The playground shows CJK and Thai tokens: where the browser test runs (chromium installed by
scripts/browser_setup.sh), fontconfig must have a font for each script, or chromium draws their tokens as boxes."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

LANGS = ("zh", "ja", "ko", "th")


def test_fonts_for_cjk_and_thai():
    if not Path("/usr/bin/chromium").exists() and not os.environ.get("QWENLAB_REQUIRE_BROWSER"):
        pytest.skip("no browser set up here (scripts/browser_setup.sh installs chromium and the fonts)")
    assert shutil.which("fc-list"), "fc-list missing: run scripts/browser_setup.sh"
    listed = {lang: subprocess.run(["fc-list", f":lang={lang}", "family"], capture_output=True, text=True).stdout
              for lang in LANGS}
    missing = [lang for lang, families in listed.items() if not families.strip()]
    assert not missing, f"no font for {missing}: run scripts/browser_setup.sh"
