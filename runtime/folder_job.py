"""Folder runs of the canny2image command: every readable file is processed, each failure is
recorded, and under torchrun the files are shared among the processes.

    canny2image in/ --outdir out/                                      # one process
    torchrun --standalone --nproc-per-node 4 -m runtime.cli in/ --outdir out/   # four GPUs

* Order, seeds, batches: the files in name order (runtime/app.py's list_inputs); file i gets
  seeds[i] (--seed for every file, or with -1 a random one per file drawn once at the start).
  The files are cut into windows of --batch-size consecutive files; within a window the files
  whose edge maps have one size form one model batch. None of this depends on the number of
  processes, so every PNG (name, seed, pixels) is the one a single-process run writes.
* Shares: torchrun is recognised by WORLD_SIZE/RANK/LOCAL_RANK in the environment; rank r takes
  windows r, r + W, r + 2W, ... and runs on cuda:LOCAL_RANK (or the CPU).
* Files: only regular files (or links to them) are inputs; FIFOs, devices, sockets, folders and
  link loops are skipped unopened and listed in the manifest's "skipped". With --outdir the
  input folder, this command's own PNGs there are not inputs. Every output is planned and checked
  before any work (runtime/outputs.py: never an input, never shared, an existing file only with
  --overwrite) and written atomically, all of an input's files or none.
* Resume: the manifest records the job's settings ("job") and is rewritten as files finish (at
  most every MANIFEST_EVERY_S s, and on SIGINT/SIGTERM/a full disk). A run with the same settings
  skips the inputs the manifest records as done with their files present, and says so;
  --overwrite redoes them; other settings refuse, naming the files they would replace.
* Start: under torchrun every rank checks in at the job's key-value store (torchrun's, or one
  rank 0 serves at MASTER_ADDR:MASTER_PORT); rank 0 waits --rendezvous-timeout seconds at most,
  naming the ranks that never came, then sends its plan (file list, seeds, parts folder) through
  the store. That is the only time ranks wait on each other: afterwards ranks only append one
  line per file to their part of the manifest (out/.canny2image-parts-<id>/rank<r>.jsonl) and an
  end line when done. Rank 0 reads the parts for its progress bar and the per-file lines, waits
  for every end line (giving up after --wait-timeout seconds without news from anyone), writes
  out/manifest.json; the CLI then exits non-zero if any file failed. The other ranks return
  normally after their share, so that torchrun does not stop rank 0 before it has merged.
"""
import dataclasses
import json
import logging
import os
import random
import socket
import sys
import time
import uuid

from runtime.errors import device_out_of_memory, first_line
from runtime.outputs import OutputError, shown

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MANIFEST = "manifest.json"
PARTS_PREFIX = ".canny2image-parts-"
POLL_S = 0.5              # how often rank 0 looks at the other ranks' parts
MANIFEST_EVERY_S = 2.0    # rank 0 rewrites manifest.json at most this often while working
SHARED_DIR_WAIT_S = 30.0  # a network filesystem can take a few seconds to show a new folder
RENDEZVOUS_TIMEOUT_S = 120.0   # --rendezvous-timeout's default


class JobError(Exception):
    """A problem with the job as a whole (one line)."""


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None):
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            ranks = cls(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]),
                        int(env.get("LOCAL_RANK", "0")))
        except ValueError:
            raise JobError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets "
                           "them)") from None
        if not (ranks.world >= 1 and 0 <= ranks.rank < ranks.world and ranks.local_rank >= 0):
            raise JobError(f"RANK {ranks.rank}, WORLD_SIZE {ranks.world}, LOCAL_RANK "
                           f"{ranks.local_rank} do not fit together")
        return ranks


def rank_device(device, ranks):
    """cuda:LOCAL_RANK for an unnumbered CUDA/HIP device under torchrun; anything else as is.
    Makes that device current too, so code that uses the current device agrees with the model."""
    import torch
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", ranks.local_rank if ranks.world > 1 else 0)
    if device.index >= torch.cuda.device_count():
        raise JobError(f"LOCAL_RANK {ranks.local_rank}: this machine has only "
                       f"{torch.cuda.device_count()} GPU(s); start at most that many processes "
                       f"per machine (--nproc-per-node)")
    torch.cuda.set_device(device)
    return device


@dataclasses.dataclass
class Task:
    index: int
    name: str      # output file stem (unique in the folder: runtime/outputs.py's rule)
    path: str
    seed: int


def list_folder(folder, outdir=None):
    """([(name, path)], skipped) for the image files of `folder`, in name order. Only regular
    files (or links to them) are inputs: FIFOs, devices, sockets, folders and symbolic link loops
    are never opened and come back in `skipped` as {"input", "reason"}. When `outdir` is `folder`,
    the PNGs this command wrote there (its text chunks say so) are outputs, not inputs."""
    from ldm.util import special_file
    from runtime import outputs
    same = outdir is not None and os.path.realpath(folder) == os.path.realpath(outdir)
    files, skipped = [], []
    for name in sorted(os.listdir(folder)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        path = os.path.join(folder, name)
        try:
            kind = special_file(path)
        except OSError as e:
            skipped.append({"input": outputs.storable(path),
                            "reason": f"cannot be read ({e.strerror or e})"})
            continue
        if kind is not None:
            skipped.append({"input": outputs.storable(path),
                            "reason": f"{kind}, not an image file"})
        elif not (same and outputs.read_text(path) is not None):
            files.append(path)
    return list(zip(outputs.stems(files), files)), skipped


def plan(inputs, seed):
    """[Task] for [(name, path)] in order: --seed for every file, or a random one each for -1."""
    seeds = ([random.randint(0, 65535) for _ in inputs] if seed == -1 else [seed] * len(inputs))
    return [Task(i, name, path, s) for i, ((name, path), s) in enumerate(zip(inputs, seeds))]


@dataclasses.dataclass
class Plan:
    """What a folder job does: `tasks` to run; `records` already made (inputs done by an earlier
    run of the same job, names too long); `skipped` (not regular files); `resumed` (input
    paths carried over from the earlier run)."""
    tasks: list
    records: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    resumed: list = dataclasses.field(default_factory=list)
    total: int = 0
    folder: str = None      # the input folder's real path (a resume is of the same folder)


def _previous(outdir):
    """The manifest of an earlier job in `outdir` (a dict), or None."""
    path = os.path.join(outdir, MANIFEST)
    if _complete(path):
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
            return manifest if isinstance(manifest, dict) else None
        except (OSError, ValueError):
            pass
    return None


def prepare(inputs, skipped, settings, seed, folder):
    """The Plan of a folder job over `inputs` ([(name, path)] of `folder`), checked against what
    `settings.outdir` holds (OutputError, one line naming the files, when it would clobber
    anything). Inputs whose outputs an earlier run with the same settings over the same folder
    wrote completely and recorded in its manifest are carried over, unless settings.overwrite."""
    from runtime import outputs
    outdir = settings.outdir
    previous = _previous(outdir)
    real = outputs.storable(os.path.realpath(folder))
    same_job = (previous is not None and previous.get("job") == settings.job
                and previous.get("folder") == real)
    done = {}
    if same_job and not settings.overwrite:
        for r in previous.get("files", []):
            if (isinstance(r, dict) and r.get("error") is None and r.get("outputs")
                    and all(_complete(os.path.join(outdir, f)) for f in r["outputs"])):
                done[os.path.basename(str(r.get("input")))] = r
    tasks = plan(inputs, seed)
    count = 1 + settings.params["num_samples"]
    result = Plan([], skipped=list(skipped), total=len(tasks), folder=real)
    planned = {}
    for task in tasks:
        record = done.get(os.path.basename(outputs.storable(task.path)))
        if record is not None:
            result.records.append({**record, "index": task.index})
            result.resumed.append(task.path)
            continue
        names = output_names(task, count, settings.tag)
        reason = next(filter(None, (outputs.too_long(n, outdir) for n in names)), None)
        if reason:
            result.records.append(_record(task, 0, error=reason))
            continue
        for name in names:
            planned[os.path.join(outdir, name)] = task.path
        result.tasks.append(task)
    texts = {}

    def ours(path):
        if os.path.basename(path) == MANIFEST:
            return same_job
        source = planned.get(path)
        if source not in texts:
            texts[source] = settings.text(source, seed)
        return same_job and outputs.same_origin(path, texts[source])

    planned[os.path.join(outdir, MANIFEST)] = None
    outputs.check_plan(planned, [p for _, p in inputs], outdir, overwrite=settings.overwrite,
                       ours=ours)
    return result


def _complete(path):
    from ldm.util import special_file
    try:
        return special_file(path) is None
    except OSError:
        return False


def windows(tasks, size):
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


def share(tasks, size, ranks):
    """This rank's windows: every world-th window of `size` consecutive tasks."""
    return windows(tasks, size)[ranks.rank::ranks.world]


@dataclasses.dataclass
class Settings:
    """What the per-file loop needs from the command (runtime.app builds it from the flags)."""
    outdir: str
    params: dict            # process() keyword arguments except the image and the seed
    batch_size: int = 1
    tag: str = ""           # "_random-weights" or ""
    text: object = None     # text(source, seed) -> the PNG text chunks
    quiet: bool = False
    wait_timeout: float = 1800.0
    job: dict = None        # what makes the images (a restart with other values is no resume)
    overwrite: bool = False


def output_names(task, count, tag):
    """The PNG names of a task's results: the edge map, then one per sample."""
    return ([f"{task.name}_edges.png"]
            + [f"{task.name}_{i}_seed{task.seed}{tag}.png" for i in range(count - 1)])


def _record(task, rank, outputs=(), seconds=0.0, error=None):
    from runtime.outputs import storable
    return {"index": task.index, "input": storable(task.path), "outputs": list(outputs),
            "seed": task.seed, "rank": rank, "seconds": round(seconds, 3),
            "error": None if error is None else storable(error)}


def _reason(e, expected, path=None):
    if isinstance(e, expected):
        # "path: reason" -> "reason": the record names the path already (the message shows the
        # path as outputs.shown does: escaped where it is not printable UTF-8)
        msg, prefix = str(e), f"{shown(path)}: " if path else None
        return msg[len(prefix):] if prefix and msg.startswith(prefix) else msg
    if isinstance(e, (MemoryError, device_out_of_memory())):
        return "out of memory: try a lower --image-resolution, fewer --num-samples or a smaller " \
               "--batch-size"
    return f"{type(e).__name__}: {e}"


class _Worker:
    """Processes this rank's windows with one pipeline; yields one record per task."""

    def __init__(self, pipeline, settings, ranks, read, write, expected, tick):
        self.pipeline, self.s, self.ranks = pipeline, settings, ranks
        self.read, self.write, self.expected, self.tick = read, write, expected, tick

    def run(self, my_windows):
        for window in my_windows:
            yield from self._window(window)

    def _window(self, window):
        from runtime.inputs import resized_shape
        loaded = []
        for task in window:
            t0 = time.perf_counter()
            try:
                image = self.read(task.path)
                self.pipeline.check(image, seed=task.seed, **self.s.params)
            except Exception as e:   # a bad file is recorded and the job goes on
                yield _record(task, self.ranks.rank, seconds=time.perf_counter() - t0,
                              error=_reason(e, self.expected, task.path))
                continue
            size = resized_shape(image.shape[0], image.shape[1], self.s.params["image_resolution"])
            loaded.append((size, task, image, time.perf_counter() - t0))
        groups = {}
        for item in loaded:   # same edge-map size, in file order
            groups.setdefault(item[0], []).append(item[1:])
        batchable = self.s.batch_size > 1 and self.s.params["eta"] == 0
        for group in groups.values():
            batches = [group] if batchable else [[item] for item in group]
            for batch in batches:
                yield from self._batch(batch)

    def _batch(self, batch):
        t0 = time.perf_counter()
        tasks = [task for task, _, _ in batch]
        read_s = sum(s for _, _, s in batch)
        try:
            if len(batch) == 1:
                results = [self.pipeline.process(batch[0][1], seed=tasks[0].seed,
                                                 progress=self.tick, **self.s.params)]
            else:
                results = self.pipeline.process_batch([image for _, image, _ in batch],
                                                      [t.seed for t in tasks], progress=self.tick,
                                                      **self.s.params)
        except Exception as e:
            _free_device_memory()
            if len(batch) > 1:
                # e.g. out of memory at this batch size: one at a time instead (these files then
                # match a --batch-size 1 run), so that only a file that fails alone is a failure
                logger.warning("a batch of %d files failed (%s); running them one at a time",
                               len(batch), _reason(e, self.expected))
                for item in batch:
                    yield from self._batch([item])
                return
            yield _record(tasks[0], self.ranks.rank, seconds=time.perf_counter() - t0 + read_s,
                          error=_reason(e, self.expected))
            return
        seconds = (time.perf_counter() - t0 + read_s) / len(batch)
        for task, images in zip(tasks, results):
            names = output_names(task, len(images), self.s.tag)
            text = self.s.text(task.path, task.seed)
            try:
                self.write([(os.path.join(self.s.outdir, name), image, text)
                            for name, image in zip(names, images)])
            except OutputError as e:
                yield _record(task, self.ranks.rank, seconds=seconds, error=str(e))
                if e.fatal:      # a full disk: every next file would fail after its work
                    raise
                continue
            yield _record(task, self.ranks.rank, names, seconds)


def write_outputs(items):
    """[(path, image, text)] as PNGs, all or nothing (runtime/outputs.py's write_set)."""
    from runtime import outputs
    outputs.write_set([(path, outputs.png_writer(image, text)) for path, image, text in items])


def _free_device_memory():
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Part:
    """One rank's part of the manifest: JSON lines, appended and closed one at a time (a network
    filesystem shows another machine what was written once the file is closed)."""

    def __init__(self, folder, rank):
        self.path = os.path.join(folder, f"rank{rank}.jsonl")
        self.offset = 0
        self.ended = False

    def append(self, obj):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")

    def read_new(self):
        """New complete lines since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            obj = json.loads(line)
            if obj.get("end"):
                self.ended = True
            else:
                out.append(obj)
        return out


class _Reporter:
    """Rank 0: one progress bar over all files, one line per file, the merged records, and
    manifest.json rewritten as records come (at most every MANIFEST_EVERY_S seconds)."""

    def __init__(self, total, settings, parts, say, save):
        self.records = {}
        self.parts = parts
        self.say = say
        self.save = save
        self.last_poll = self.last_save = 0.0
        self.last_news = time.monotonic()
        self.bar = None
        if not settings.quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="canny2image", unit="file", file=sys.stderr)

    def add(self, record):
        self.records[record["index"]] = record
        self.last_news = time.monotonic()
        where = f" (rank {record['rank']})" if self.parts else ""
        if record["error"]:
            self._line(f"FAILED {shown(record['input'])}{where}: {shown(record['error'])}")
        else:
            self._line(f"{shown(record['input'])}: seed {record['seed']}, "
                       f"{record['seconds']:.1f} s{where}")
        if self.bar is not None:
            self.bar.update(1)
        if time.monotonic() - self.last_save >= MANIFEST_EVERY_S:
            self.save(self.records, complete=False)
            self.last_save = time.monotonic()

    def _line(self, msg):
        if self.bar is not None:
            self.bar.write(f"canny2image: {msg}", file=sys.stderr)
        else:
            self.say(msg)

    def step(self, done, total):
        """Called after every DDIM step of this rank: the bar shows the step; news from others."""
        if self.bar is not None and time.monotonic() - self.last_poll >= POLL_S:
            self.bar.set_postfix_str(f"step {done}/{total}")
        self.poll()

    def poll(self, force=False):
        now = time.monotonic()
        if not force and now - self.last_poll < POLL_S:
            return
        self.last_poll = now
        for part in self.parts:
            for record in part.read_new():
                self.add(record)

    def wait(self, timeout):
        """Until every part has ended; False after `timeout` s without any news."""
        while True:
            self.poll(force=True)
            if all(p.ended for p in self.parts):
                return True
            if time.monotonic() - self.last_news > timeout:
                return False
            time.sleep(POLL_S)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _store(ranks, timeout):
    """The torchrun job's key-value store (torchrun's own, or one rank 0 serves), under a prefix
    of this run: JobError in one line when it cannot be reached within `timeout` s."""
    import datetime

    from torch.distributed import PrefixStore, TCPStore
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit():
        raise JobError("MASTER_ADDR and MASTER_PORT must be set (torchrun sets them)")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = TCPStore(addr, int(port), None, ranks.rank == 0 and not agent,
                         datetime.timedelta(seconds=timeout), wait_for_workers=False)
    except Exception as e:   # DistStoreError, RuntimeError: a timeout or a refused connection
        raise JobError(f"rank {ranks.rank} on {socket.gethostname()} cannot reach the job's "
                       f"store at {addr}:{port} within --rendezvous-timeout {timeout:g} s "
                       f"({first_line(e)})") from None
    run = (os.environ.get("TORCHELASTIC_RUN_ID", "run"),
           os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return PrefixStore("canny2image/{}/{}/".format(*run), store)


def _wait_keys(store, keys, timeout):
    """The keys of `keys` still missing after `timeout` s (polling)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [k for k in keys if not store.check([k])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


def start(ranks, outdir, make_plan, rendezvous_timeout=RENDEZVOUS_TIMEOUT_S):
    """(Plan, parts folder or None). Under torchrun: every rank says it has come; rank 0 waits
    for all of them (JobError naming the ranks that never came after `rendezvous_timeout` s),
    makes the plan and the parts folder and sends both to every rank through the job's store
    (nobody has worked yet, so nothing can be waiting on a failed rank); an error on rank 0
    reaches every rank as JobError. The other ranks get the tasks only."""
    if ranks.world == 1:
        return make_plan(), None
    store = _store(ranks, rendezvous_timeout)
    store.set(f"came/{ranks.rank}", socket.gethostname())
    if ranks.rank == 0:
        missing = _wait_keys(store, [f"came/{r}" for r in range(1, ranks.world)],
                             rendezvous_timeout)
        failure, plan = None, None
        if missing:
            late = ", ".join(k.split("/")[1] for k in missing)
            failure = JobError(f"rank(s) {late} of {ranks.world} never came within "
                               f"--rendezvous-timeout {rendezvous_timeout:g} s: start the same "
                               f"command on every machine (torchrun --nnodes, --nproc-per-node)")
            message = {"error": str(failure)}
        else:
            try:
                plan = make_plan()
                parts = os.path.join(outdir, PARTS_PREFIX + uuid.uuid4().hex[:12])
                os.makedirs(parts)
                message = {"tasks": [dataclasses.asdict(t) for t in plan.tasks], "parts": parts}
            except Exception as e:   # every rank stops with rank 0's one line
                failure = e
                message = {"error": str(e)}
        store.set("plan", json.dumps(message))
        # keep serving the store until every rank that came has read the plan
        came = [r for r in range(1, ranks.world) if f"came/{r}" not in missing]
        _wait_keys(store, [f"got/{r}" for r in came], rendezvous_timeout)
        if failure is not None:
            raise failure
        return plan, parts
    if _wait_keys(store, ["came/0"], rendezvous_timeout):
        raise JobError(f"rank 0 never came within --rendezvous-timeout {rendezvous_timeout:g} s")
    try:
        while not store.check(["plan"]):     # rank 0 is listing and checking the files
            time.sleep(0.1)
        msg = json.loads(store.get("plan"))
        store.set(f"got/{ranks.rank}", "1")
    except Exception as e:
        if isinstance(e, JobError):
            raise
        raise JobError(f"rank {ranks.rank}: lost the job's store before rank 0 sent the plan "
                       f"({first_line(e)})") from None
    if "error" in msg:
        raise JobError(msg["error"])
    parts = msg["parts"]
    deadline = time.monotonic() + SHARED_DIR_WAIT_S
    while not os.path.isdir(parts):
        if time.monotonic() > deadline:
            raise JobError(f"rank {ranks.rank} on {socket.gethostname()} cannot see rank 0's "
                           f"files in --outdir {outdir}: with several machines --outdir must be "
                           f"a folder they share (NFS, ...)")
        time.sleep(POLL_S)
    return Plan([Task(**t) for t in msg["tasks"]]), parts


def run(plan, parts_dir, pipeline, settings, ranks, *, read, expected, say,
        write=write_outputs):
    """Process this rank's share of `plan.tasks`. Rank 0 merges the manifest (rewritten as
    records come, and on an interrupt); returns the records (rank 0, every file in order) or []
    (other ranks)."""
    tasks = plan.tasks
    size = max(1, settings.batch_size)
    mine = share(tasks, size, ranks)
    if ranks.rank != 0:
        part = _Part(parts_dir, ranks.rank)
        try:
            for record in _Worker(pipeline, settings, ranks, read, write, expected,
                                  None).run(mine):
                part.append(record)
        finally:   # also after an unexpected error: rank 0 then stops waiting for this rank
            part.append({"end": True, "rank": ranks.rank})
        return []

    others = [_Part(parts_dir, r) for r in range(1, ranks.world)]
    done_before = {r["index"]: r for r in plan.records}

    def save(records, complete):
        _write_manifest(settings, ranks, plan, {**done_before, **records}, complete)

    reporter = _Reporter(len(tasks), settings, others, say, save)
    complete = False
    try:
        save({}, complete=False)
        for record in _Worker(pipeline, settings, ranks, read, write, expected,
                              reporter.step).run(mine):
            reporter.add(record)
            reporter.poll()
        complete = reporter.wait(settings.wait_timeout) if others else True
    except BaseException:           # an interrupt, a full disk: what is done stays recorded
        reporter.close()
        try:
            save(reporter.records, complete=False)
        except Exception as e:
            logger.warning("%s", e)
        raise
    reporter.close()
    records = reporter.records
    late = sorted({r for r, p in enumerate(others, 1) if not p.ended})
    for task in tasks:
        if task.index not in records:
            records[task.index] = _record(
                task, None, error=(f"no result from rank(s) {late} within --wait-timeout "
                                   f"{settings.wait_timeout:g} s" if late else
                                   "its rank stopped before this file (see its error)"))
    records = {**done_before, **records}
    save(records, complete=True)
    if parts_dir is not None and complete:
        for p in others:
            _remove(p.path)
        _remove(parts_dir, folder=True)
    return [records[i] for i in sorted(records)]


def failure_message(records, outdir):
    """One line naming the failed files, or None."""
    failed = [r for r in records if r["error"]]
    if not failed:
        return None
    return (f"{len(failed)} of {len(records)} files failed (each named above and in "
            f"{shown(os.path.join(outdir, MANIFEST))}): "
            + ", ".join(shown(os.path.basename(r["input"])) for r in failed[:5])
            + (", ..." if len(failed) > 5 else ""))


def _write_manifest(settings, ranks, plan, records, complete):
    from runtime import outputs
    files = [records[i] for i in sorted(records)]
    manifest = {"inputs": plan.total, "failed": sum(1 for r in files if r["error"]),
                "complete": complete, "world_size": ranks.world,
                "batch_size": settings.batch_size, "job": settings.job, "folder": plan.folder,
                "settings": {k: outputs.storable(v) if isinstance(v, str) else v
                             for k, v in settings.params.items()},
                "resumed": [outputs.storable(p) for p in plan.resumed],
                "skipped": plan.skipped, "files": files}
    data = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
    outputs.write_file(os.path.join(settings.outdir, MANIFEST), lambda f: f.write(data))


def _remove(path, folder=False):
    try:
        os.rmdir(path) if folder else os.remove(path)
    except OSError as e:
        logger.warning("could not remove %s: %s", path, e)
