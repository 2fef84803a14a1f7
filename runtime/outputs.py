"""The files a canny2image run writes: planned before anything is written, never clobbering a
user's file, written atomically, with safe names; and names made safe for a terminal.

* Names: an input's outputs are named after its file name without the extension (`a.png` ->
  `a_edges.png`, `a_0_seed12345.png`). Where two inputs of a folder would share that stem, each of
  them keeps its extension (`a.png` -> `a.png_edges.png`, `a.jpg` -> `a.jpg_edges.png`), repeated
  until every stem is unique (file names in a folder are). In the stem, bytes that are not UTF-8
  and control characters become `%XX` (safe_name).
* Never clobber (check_plan): refused up front, naming the files, is an output that is an input
  or that two inputs would share (always), or that exists, unless --overwrite or the file is
  this command's output of the same input with the same settings (its PNG text chunks say so:
  the run then writes the same picture again).
* Atomic (write_set): every file goes to a temporary name in its folder, is fsynced and then
  os.replace()d into place; the outputs of one input are all written to temporaries before the
  first is renamed, so an error (disk full, a name too long) or an interrupt leaves none of them,
  only the files as they were. Temporaries are removed on any exception, KeyboardInterrupt and
  Terminated (SIGTERM, see handle_sigterm) included.
* One run at a time (OutdirLock): a run holds an flock on `--outdir`/.canny2image.lock while it
  plans and writes; a second run into the same folder is refused at once, naming the first.
* Text: names and prompts that are not valid UTF-8 (surrogate-escaped bytes, as Python decodes
  such file names and arguments) are stored in the manifest and PNG text chunks as `\\xHH`
  (storable) and shown on a terminal with control characters escaped too (shown).
"""
import errno
import fcntl
import logging
import os
import signal
import unicodedata
import uuid

SOFTWARE = "controlnet-fast canny2image"   # the PNG text chunk "Software" of every output
TEMP_PREFIX = ".canny2image-tmp-"
LOCK = ".canny2image.lock"
logger = logging.getLogger(__name__)
FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(Exception):
    """An output that cannot or may not be written (one line, naming the file). `fatal`: the
    disk is full, so no later file can be written either."""

    def __init__(self, message, fatal=False):
        super().__init__(message)
        self.fatal = fatal


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT (exit status 143)."""


def handle_sigterm():
    """From now on SIGTERM raises Terminated in the main thread, so that `finally` blocks run
    (temporaries removed, the manifest written) before the process exits. Returns the handler
    it replaced."""
    def raise_terminated(signum, frame):
        raise Terminated()
    return signal.signal(signal.SIGTERM, raise_terminated)


# --- text ------------------------------------------------------------------------------------

def _chars(text):
    """(char, escaped or None) for each character of `text`: escaped is `\\xHH` for a byte that
    was not UTF-8 (U+DC80..U+DCFF, Python's surrogateescape), `\\uXXXX` for another lone
    surrogate."""
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            yield ch, f"\\x{code - 0xDC00:02x}"
        elif 0xD800 <= code <= 0xDFFF:
            yield ch, f"\\u{code:04x}"
        else:
            yield ch, None


def storable(text):
    """`text` as valid Unicode (for JSON and PNG text chunks): undecodable bytes as `\\xHH`."""
    text = str(text)
    return "".join(esc or ch for ch, esc in _chars(text))


_UNSAFE_CATEGORIES = ("Cc", "Zl", "Zp")
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))   # embeddings, overrides


def _control(ch):
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES or ord(ch) in _BIDI


def shown(text):
    """`text` for a terminal: storable(), and control characters (newlines, ANSI escapes, bidi
    overrides) as visible escapes (`\\n`, `\\x1b`, `\\u202e`)."""
    out = []
    for ch, esc in _chars(str(text)):
        if esc is None and _control(ch):
            esc = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or (
                f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        out.append(esc or ch)
    return "".join(out)


def safe_name(stem):
    """A file-name stem safe to write and to show: undecodable bytes and control characters as
    `%XX` (each UTF-8 byte of the character)."""
    out = []
    for ch, esc in _chars(stem):
        if esc is not None and esc.startswith("\\x"):
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        elif esc is not None or _control(ch):
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


# --- names -----------------------------------------------------------------------------------

def stems(paths):
    """The output stems of `paths` (one folder's files, or one file) by the rule above."""
    names = [os.path.basename(p) for p in paths]
    result = [os.path.splitext(n)[0] or n for n in names]
    while True:
        clash = {s for s in result if result.count(s) > 1}
        if not clash:
            return [safe_name(s) for s in result]
        grown = [n if s in clash else s for s, n in zip(result, names)]
        if grown == result:       # cannot happen for the files of one folder
            return [safe_name(s) for s in result]
        result = grown


def name_max(folder):
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def too_long(name, folder):
    """A one-line reason when `name` is too long for `folder`'s filesystem, else None."""
    size, limit = len(os.fsencode(name)), name_max(folder)
    if size > limit:
        return (f"output name too long for the filesystem ({size} bytes, at most {limit}): "
                f"{shown(name[:40])}...; rename the input")
    return None


# --- planning --------------------------------------------------------------------------------

def read_text(path):
    """The PNG text chunks of `path` if it is a regular file and a PNG this command wrote, else
    None. Reads only the chunks before the image data."""
    from ldm.util import special_file
    try:
        if special_file(path) is not None:
            return None
        from PIL import Image
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except Exception:
        return None
    return text if text.get("Software") == SOFTWARE else None


def same_origin(path, text):
    """True if the existing file `path` is this command's output written with the PNG `text`
    (all but the seed: an edge map does not depend on it, a sample has it in its name)."""
    old = read_text(path)
    if old is None:
        return False
    strip = lambda t: {k: v for k, v in t.items() if k != "seed"}   # noqa: E731
    return strip(old) == strip({k: storable(v) for k, v in text.items()})


def listing(paths, folder, limit=4):
    """`a, b, c, ... (N files)` of the names of `paths`, shown safely."""
    names = [shown(os.path.relpath(p, folder) if folder else p) for p in paths]
    more = f", ... ({len(names)} files)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_plan(outputs, inputs, outdir, overwrite=False, ours=lambda path: False):
    """OutputError (one line naming the files) unless writing `outputs` ({path: input path that
    makes it}) into `outdir` clobbers nothing: no output is an input, none is made by two
    inputs, and none exists unless `overwrite` or `ours(path)` (this command's output of the
    same input with the same settings)."""
    def key(path):
        return os.path.normcase(os.path.realpath(path))

    input_keys = {key(p) for p in inputs if p is not None}
    made_by = {}
    for path, source in outputs.items():
        made_by.setdefault(key(path), []).append((path, source))
    shared = [items[0][0] for items in made_by.values() if len(items) > 1]
    if shared:
        raise OutputError(f"two inputs would write the same output file: "
                          f"{listing(shared, outdir)}; rename one of them")
    are_inputs = [p for p in outputs if key(p) in input_keys]
    if are_inputs:
        raise OutputError(f"--outdir {shown(outdir)}: the outputs would overwrite input files: "
                          f"{listing(are_inputs, outdir)}; choose another --outdir")
    for path in outputs:
        reason = too_long(os.path.basename(path), outdir)
        if reason:
            raise OutputError(f"{shown(outputs[path] or path)}: {reason}")
    if overwrite:
        return
    exist = [p for p in outputs if os.path.lexists(p) and not ours(p)]
    if exist:
        raise OutputError(f"--outdir {shown(outdir)}: {len(exist)} file(s) exist and would be "
                          f"overwritten: {listing(exist, outdir)} (written by another run or "
                          f"not by canny2image); pass --overwrite to replace them, or choose "
                          f"another --outdir")


# --- writing ---------------------------------------------------------------------------------

def png_writer(image, text):
    """A writer (file object -> None) of `image` (uint8 HxWx3) as PNG with `text` chunks."""
    def write(f):
        from PIL import Image, PngImagePlugin
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, storable(value))
        Image.fromarray(image).save(f, format="PNG", pnginfo=info)
    return write


def _reason(e):
    if e.errno in FULL:
        return f"{e.strerror} (the disk is full)"
    return e.strerror or str(e)


def _temporary(folder):
    return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_set(items):
    """Write [(path, writer)] all or nothing: each writer (file object -> None) fills a temporary
    in its path's folder (fsynced), then the temporaries are renamed into place. On any error or
    interrupt no temporary is left, and the paths already renamed by this call are removed again.
    OSError becomes OutputError naming the file."""
    temps, placed = [], []
    try:
        for path, writer in items:
            temp = _temporary(os.path.dirname(path) or ".")
            temps.append(temp)
            try:
                with open(temp, "xb") as f:
                    writer(f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise OutputError(f"cannot write {shown(path)}: {_reason(e)}",
                                  fatal=e.errno in FULL) from None
        for (path, _), temp in zip(items, temps):
            try:
                os.replace(temp, path)
            except OSError as e:
                raise OutputError(f"cannot write {shown(path)}: {_reason(e)}",
                                  fatal=e.errno in FULL) from None
            placed.append(path)
        for folder in {os.path.dirname(p) or "." for p, _ in items}:
            _fsync_dir(folder)
    except BaseException:
        for path in temps + placed:
            try:
                os.remove(path)
            except OSError:
                pass
        raise


def write_file(path, writer):
    write_set([(path, writer)])


def remove_stale_temporaries(folder):
    """Remove temporaries left in `folder` by a process of this machine that no longer runs
    (killed by SIGKILL while writing)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        pid = name[len(TEMP_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class OutdirLock:
    """An exclusive flock on `folder`/.canny2image.lock, held until release() (or the process
    ends): OutputError naming the other run when one holds it. Where the filesystem has no
    locks the run goes on unlocked, with a warning."""

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(self.fd, 200).decode("utf-8", "replace").strip() or "?"
            os.close(self.fd)
            raise OutputError(f"--outdir {shown(folder)}: another canny2image run ({other}) is "
                              f"writing there; wait for it to end, or choose another --outdir")
        except OSError as e:       # ENOLCK, EOPNOTSUPP: e.g. some network filesystems
            logger.warning("--outdir %s: cannot lock it (%s); make sure no other run writes "
                           "there", shown(folder), e.strerror or e)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
