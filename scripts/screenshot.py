#!/usr/bin/env python
"""A PNG of a knnlm-inspect page with one token's neighbour panel open (the README's picture), in headless Chromium.

    python scripts/screenshot.py PAGE.html OUT.png [--token I]   (default: the token with the largest gain on page 1)
"""
import argparse
import json
import re
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page")
    p.add_argument("out")
    p.add_argument("--token", type=int)
    a = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    text = Path(a.page).read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="knnlm-data">(.*?)</script>', text, re.S).group(1))
    gains = data["tokens"]["gain"][:2000]
    token = a.token if a.token is not None else max(range(len(gains)), key=gains.__getitem__)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--disable-background-networking", "--no-first-run", f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(Path(a.page).resolve().as_uri())
        while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
            time.sleep(0.05)
        span = driver.find_element("css selector", f'#passage span.t[data-i="{token}"]')
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", span)
        span.click()
        driver.save_screenshot(a.out)
    finally:
        driver.quit()
    print(f"wrote {a.out} (token {token})")


if __name__ == "__main__":
    main()
