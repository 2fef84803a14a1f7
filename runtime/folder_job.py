"""Folder runs of the canny2image command: every readable file is processed, each failure is
recorded, and under torchrun the files are shared among the processes.

    canny2image in/ --outdir out/                                      # one process
    torchrun --standalone --nproc-per-node 4 -m runtime.cli in/ --outdir out/   # four GPUs

* Order, seeds, batches: the files in name order (runtime/app.py's list_inputs); file i gets seeds[i]
  (--seed for every file, or with -1 a random one per file drawn once at the start). The files are
  cut into windows of --batch-size consecutive files; within a window the files whose edge maps
  have one size form one model batch. None of this depends on the number of processes, so every
  PNG (name, seed, pixels) is the one a single-process run writes.
* Shares: torchrun is recognised by WORLD_SIZE/RANK/LOCAL_RANK in the environment; rank r takes
  windows r, r + W, r + 2W, ... and runs on cuda:LOCAL_RANK (or the CPU).
* Nothing waits on a failed rank: the only collective is one gloo broadcast at the start, before
  anyone has worked (rank 0's file list, seeds and run id). Afterwards ranks only append one line
  per file to their part of the manifest (out/.canny2image-parts-<id>/rank<r>.jsonl) and an end
  line when done. Rank 0 reads the parts for its progress bar and the per-file lines, waits for
  every end line (giving up after --wait-timeout seconds without news from anyone), writes
  out/manifest.json; the CLI then exits non-zero if any file failed. The other ranks return normally
  after their share, so that torchrun does not stop rank 0 before it has merged.
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

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PARTS_PREFIX = ".canny2image-parts-"
POLL_S = 0.5              # how often rank 0 looks at the other ranks' parts
SHARED_DIR_WAIT_S = 30.0  # a network filesystem can take a few seconds to show a new folder


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
    name: str      # output file stem (unique in the folder)
    path: str
    seed: int


def plan(inputs, seed):
    """[Task] for [(name, path)] in order: --seed for every file, or a random one each for -1."""
    seeds = ([random.randint(0, 65535) for _ in inputs] if seed == -1 else [seed] * len(inputs))
    return [Task(i, name, path, s) for i, ((name, path), s) in enumerate(zip(inputs, seeds))]


def windows(tasks, size):
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


def share(tasks, size, ranks):
    """This rank's windows: every world-th window of `size` consecutive tasks."""
    return windows(tasks, size)[ranks.rank::ranks.world]


@dataclasses.dataclass
class Settings:
    """What the per-file loop needs from the CLI."""
    outdir: str
    params: dict            # process() keyword arguments except the image and the seed
    batch_size: int = 1
    tag: str = ""           # "_random-weights" or ""
    text: object = None     # text(source, seed) -> the PNG text chunks
    quiet: bool = False
    wait_timeout: float = 1800.0


def output_names(task, count, tag):
    """The PNG names of a task's results: the edge map, then one per sample."""
    return ([f"{task.name}_edges.png"]
            + [f"{task.name}_{i}_seed{task.seed}{tag}.png" for i in range(count - 1)])


def _record(task, rank, outputs=(), seconds=0.0, error=None):
    return {"index": task.index, "input": task.path, "outputs": list(outputs), "seed": task.seed,
            "rank": rank, "seconds": round(seconds, 3), "error": error}


def _reason(e, expected, path=None):
    if isinstance(e, expected):
        msg = str(e)   # "path: reason" -> "reason": the record names the path already
        return msg[len(path) + 2:] if path and msg.startswith(f"{path}: ") else msg
    import torch
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
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
            try:
                for name, image in zip(names, images):
                    self.write(os.path.join(self.s.outdir, name), image,
                               self.s.text(task.path, task.seed))
            except OSError as e:
                yield _record(task, self.ranks.rank, seconds=seconds,
                              error=f"cannot write {name} ({e.strerror or e})")
                continue
            yield _record(task, self.ranks.rank, names, seconds)


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
    """Rank 0: one progress bar over all files, one line per file, the merged records."""

    def __init__(self, total, settings, parts, say):
        self.records = {}
        self.parts = parts
        self.say = say
        self.last_poll = 0.0
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
            self._line(f"FAILED {record['input']}{where}: {record['error']}")
        else:
            self._line(f"{record['input']}: seed {record['seed']}, {record['seconds']:.1f} s"
                       f"{where}")
        if self.bar is not None:
            self.bar.update(1)

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


def start(ranks, outdir, make_tasks):
    """(tasks, parts folder or None). Under torchrun: rank 0 makes the tasks and the parts folder
    and sends both to every rank in the job's only collective (nobody has worked yet, so nothing
    can be waiting on a failed rank); an error on rank 0 reaches every rank as JobError."""
    if ranks.world == 1:
        return make_tasks(), None
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    try:
        message, failure = [None], None
        if ranks.rank == 0:
            try:
                tasks = make_tasks()
                parts = os.path.join(outdir, PARTS_PREFIX + uuid.uuid4().hex[:12])
                os.makedirs(parts)
                message = [{"tasks": [dataclasses.asdict(t) for t in tasks], "parts": parts}]
            except Exception as e:   # every rank stops with rank 0's one line
                failure = e
                message = [{"error": str(e)}]
        dist.broadcast_object_list(message, src=0)
    finally:
        dist.destroy_process_group()
    msg = message[0]
    if failure is not None:
        raise failure
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
    return [Task(**t) for t in msg["tasks"]], parts


def run(tasks, parts_dir, pipeline, settings, ranks, *, read, write, expected, say):
    """Process this rank's share of `tasks`. Rank 0 merges the manifest; returns the records
    (rank 0, every file in order) or [] (other ranks)."""
    size = max(1, settings.batch_size)
    mine = share(tasks, size, ranks)
    if ranks.rank != 0:
        part = _Part(parts_dir, ranks.rank)
        try:
            for record in _Worker(pipeline, settings, ranks, read, write, expected, None).run(mine):
                part.append(record)
        finally:   # also after an unexpected error: rank 0 then stops waiting for this rank
            part.append({"end": True, "rank": ranks.rank})
        return []

    others = [_Part(parts_dir, r) for r in range(1, ranks.world)]
    reporter = _Reporter(len(tasks), settings, others, say)
    tick = reporter.step
    try:
        for record in _Worker(pipeline, settings, ranks, read, write, expected, tick).run(mine):
            reporter.add(record)
            reporter.poll()
        complete = reporter.wait(settings.wait_timeout) if others else True
    finally:
        reporter.close()
    records = reporter.records
    if not complete:
        late = sorted({r for r, p in enumerate(others, 1) if not p.ended})
        for task in tasks:
            if task.index not in records:
                records[task.index] = _record(
                    task, None, error=f"no result from rank(s) {late} within --wait-timeout "
                                      f"{settings.wait_timeout:g} s")
    records = [records[t.index] for t in tasks]
    _write_manifest(settings, ranks, records)
    if parts_dir is not None and complete:
        for p in others:
            _remove(p.path)
        _remove(parts_dir, folder=True)
    return records


def failure_message(records, outdir):
    """One line naming the failed files, or None."""
    failed = [r for r in records if r["error"]]
    if not failed:
        return None
    return (f"{len(failed)} of {len(records)} files failed (each named above and in "
            f"{os.path.join(outdir, MANIFEST)}): "
            + ", ".join(os.path.basename(r["input"]) for r in failed[:5])
            + (", ..." if len(failed) > 5 else ""))


def _write_manifest(settings, ranks, records):
    manifest = {"inputs": len(records), "failed": sum(1 for r in records if r["error"]),
                "world_size": ranks.world, "batch_size": settings.batch_size,
                "settings": settings.params, "files": records}
    path = os.path.join(settings.outdir, MANIFEST)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _remove(path, folder=False):
    try:
        os.rmdir(path) if folder else os.remove(path)
    except OSError as e:
        logger.warning("could not remove %s: %s", path, e)
