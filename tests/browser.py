"""Driving ``dbsam app`` in headless Chromium (Debian's ``chromium`` + ``chromium-driver``) with Selenium.

Shared by the browser test and ``benchmarks/bench_app.py``: nothing is downloaded, the system browser
and driver are used, and every action is a real DOM event (file input, mouse clicks, button presses).
"""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_MISSING = (
    None
    if CHROMIUM and CHROMEDRIVER
    else "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
)


def start_browser(width: int = 1400, height: int = 1100):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


OVERLAY_TIMER = """
const view = document.querySelector('#slice-view'), status = document.querySelector('#status');
const before = (view.querySelector('img') || {}).src;
let start = null, statusAtClick = null, outcome = null, report = null;
window.segmentClickedAt = null;
document.querySelector('#segment').addEventListener('click', () => {
  start = performance.now();
  window.segmentClickedAt = Date.now();
  statusAtClick = status.textContent;
}, {capture: true, once: true});
const settle = (value) => { if (outcome === null) { outcome = value; if (report) report(value); } };
window.whenOverlayShown = (callback) => { if (outcome !== null) callback(outcome); else report = callback; };
new MutationObserver(() => {  // textContent, not innerText: no layout while the model runs
  const text = status.textContent;
  if (start !== null && text !== statusAtClick && text.includes('Error:')) settle(text.slice(text.indexOf('Error:')).trim());
}).observe(status, {subtree: true, childList: true, characterData: true});
const observer = new MutationObserver(() => {
  const image = view.querySelector('img');
  if (!image || image.src === before || start === null) return;
  observer.disconnect();
  const shown = () => settle(performance.now() - start);
  if (image.complete && image.naturalWidth > 0) shown(); else image.addEventListener('load', shown, {once: true});
});
observer.observe(view, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
"""
"""A clock in the page from the real click on Segment to the slice view showing a new, decoded image (or to
an error in the status line)."""


class AppPage:
    """The app's page in a browser, addressed by the components' ``elem_id``."""

    def __init__(self, driver, url: str, timeout: float = 120):
        self.driver, self.timeout = driver, timeout
        driver.get(url)
        self.wait_for(lambda: self.find_all("#scan-upload input[type=file]"))

    def find_all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def find(self, css: str):
        found = self.wait_for(lambda: self.find_all(css))
        return found[0]

    def wait_for(self, condition, timeout: float | None = None, poll: float = 0.05):
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"the page did not reach the expected state in {timeout or self.timeout} s")

    def text(self, css: str) -> str:
        elements = self.find_all(css)
        return elements[0].text if elements else ""

    def image_source(self) -> str:
        images = self.find_all("#slice-view img")
        return images[0].get_attribute("src") if images else ""

    def upload(self, path: str) -> None:
        before = self.image_source()
        self.find("#scan-upload input[type=file]").send_keys(path)
        self.wait_for(lambda: self.image_source() not in ("", before))

    def click_voxel(self, x: int, y: int, scale: int) -> None:
        """A real mouse click on the centre of voxel column ``x``, row ``y`` of the shown slice."""
        from selenium.webdriver.common.action_chains import ActionChains

        image = self.loaded_image()
        natural = int(image.get_attribute("naturalWidth"))
        factor = image.rect["width"] / natural
        dx = (x * scale + scale / 2) * factor - image.rect["width"] / 2
        dy = (y * scale + scale / 2) * factor - image.rect["height"] / 2
        ActionChains(self.driver).move_to_element_with_offset(image, round(dx), round(dy)).click().perform()

    def draw_box(self, box: tuple[int, int, int, int], scale: int) -> None:
        """Two clicks at opposite corners, waiting for the page to confirm each."""
        x0, y0, x1, y1 = box
        self.click_voxel(x0, y0, scale)
        self.wait_for(lambda: "first corner" in self.text("#status"))
        self.click_voxel(x1, y1, scale)
        self.wait_for(lambda: f"box x={x0}..{x1}, y={y0}..{y1}" in self.text("#status"))

    def type_into(self, css: str, text: str) -> None:
        field = self.find(f"{css} textarea, {css} input")
        field.clear()
        field.send_keys(text)

    def segment(self, name: str) -> float:
        """Press Segment; return the seconds from the click to the new overlay image loaded, timed inside the
        page. The wait is one asynchronous script that the page answers: no polling from here, which on a
        small machine would take CPU from the segmentation being timed.
        """
        self.driver.execute_script(OVERLAY_TIMER)
        self.find("#segment").click()
        self.driver.set_script_timeout(self.timeout)
        outcome = self.driver.execute_async_script("window.whenOverlayShown(arguments[arguments.length - 1]);")
        if isinstance(outcome, str):
            raise RuntimeError(f"Segment failed in the page: {outcome}")
        self.wait_for(lambda: f"segmented {name!r}" in self.text("#status"))
        return outcome / 1000

    def loaded_image(self):
        """The slice's <img> once the browser has decoded it."""
        self.wait_for(lambda: self.driver.execute_script(
            "const i = document.querySelector('#slice-view img'); return i && i.complete && i.naturalWidth > 0;"))  # fmt: skip
        return self.find("#slice-view img")

    def shown_slice(self) -> np.ndarray:
        """The slice image as the browser shows it, from a screenshot of the element (RGB)."""
        png = self.loaded_image().screenshot_as_png
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def error_message(self) -> str:
        """The error the status line shows, once one appears."""
        return self.wait_for(lambda: self.text("#status") if self.text("#status").startswith("Error:") else "")
