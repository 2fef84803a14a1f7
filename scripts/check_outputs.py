"""Check what a canny2image run announced: its last line on stdout,

    canny2image: wrote 2 PNGs to /abs/outputs: a_edges.png, a_0_seed12345.png[ (RANDOM WEIGHTS...)]

must name files that exist and are valid PNG images, as many as the line says. A line that shows
only the first few names (", ... (N files)", a folder run) is completed from the folder's
manifest.json. Used by .ci/run after the README's main-job command and by tests/test_packaging.py.

    bash scripts/run_default.sh | tee run.log && python scripts/check_outputs.py run.log

Exit status 0 and one line listing the files when every file is good, 1 and one line otherwise.
"""
import json
import os
import re
import sys

LINE = re.compile(r"^canny2image: wrote (\d+) PNGs to (.+?): (.*?)(?: \(RANDOM WEIGHTS[^)]*\))?$")
TRUNCATED = re.compile(r", \.\.\. \((\d+) files\)$")


class CheckError(Exception):
    pass


def announced(text):
    """The PNG paths the run's last non-empty line announces (CheckError if it announces none)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise CheckError("the run printed nothing on stdout")
    match = LINE.match(lines[-1].strip())
    if not match:
        raise CheckError(f"the last line is not canny2image's 'wrote N PNGs to ...': "
                         f"{lines[-1].strip()!r}")
    count, folder, shown = int(match[1]), match[2], match[3]
    if count == 0:
        raise CheckError("the run wrote no PNGs")
    if TRUNCATED.search(shown):
        manifest = os.path.join(folder, "manifest.json")
        try:
            with open(manifest, encoding="utf-8") as f:
                records = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckError(f"the line lists only some of the {count} files and {manifest} "
                             f"cannot be read ({e})") from None
        names = [name for record in records for name in record["outputs"]]
    else:
        names = shown.split(", ")
    if len(names) != count:
        raise CheckError(f"the line says {count} PNGs but names {len(names)}")
    return [os.path.join(folder, name) for name in names]


def check_png(path):
    """CheckError unless `path` is a complete, decodable PNG image."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.verify()                    # checksums and structure
        with Image.open(path) as image:       # verify() leaves the image unusable: decode anew
            image.load()
            if image.format != "PNG" or min(image.size) < 1:
                raise CheckError(f"{path}: not a PNG image ({image.format}, {image.size})")
    except CheckError:
        raise
    except Exception as e:
        raise CheckError(f"{path}: not a valid image ({type(e).__name__}: {e})") from None


def check(text):
    """The announced paths, each checked; CheckError on the first problem."""
    paths = announced(text)
    for path in paths:
        check_png(path)
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        print("usage: check_outputs.py [LOG]  (default: stdin)", file=sys.stderr)
        return 2
    try:
        if argv:
            with open(argv[0], encoding="utf-8", errors="replace") as f:
                text = f.read()
        else:
            text = sys.stdin.read()
        paths = check(text)
    except (CheckError, OSError) as e:
        print(f"check_outputs: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"check_outputs: {len(paths)} valid PNGs: " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
