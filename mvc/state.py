"""Every place mvc keeps state, named once. docs/format.md §2 shows each with an example.

Nothing else in mvc spells these names: a module that keeps state imports its key from here,
so a reader finds every kv key, config key, ref namespace and scratch path in one page.
"""

from __future__ import annotations

# -- the repository directory ----------------------------------------------------------------
REPO_DIR = ".mvc"  # in the work tree's root
CONFIG_FILE = "config.json"  # .mvc/config.json: JSON, written atomically (tmp + rename), read first
LOCK_FILE = "lock"  # .mvc/lock: flock()ed by commands that change the work tree or delete objects
STORE_LOCK_FILE = "store.lock"  # .mvc/store.lock: shared by fetch (it stores objects no ref names yet),
#                                 exclusive for gc and repack (they delete or move objects)
STORE_DIR = "store"  # .mvc/store: the LMDB environment (objects, refs, reflog, kv)
TMP_DIR = "tmp"  # .mvc/tmp: scratch of compression waves (wave-*/), removed after each wave
IGNORE_FILE = ".mvcignore"  # in the work tree: gitignore syntax
TMP_SUFFIX = ".mvc-tmp"  # a work-tree file being written (renamed into place when complete)
GIT_STORE = "mvc"  # .git/mvc: the store of the Git filter (a bare store, same layout as .mvc/store)

# -- keys of the store's kv table -----------------------------------------------------------
KV_STAT = b"stat:"  # + 32 hex digits of BLAKE3(path): the stat cache entry of a work-tree file
KV_MERGE = b"merge"  # the state of a merge with conflicts (JSON)
KV_BISECT = b"bisect"  # the state of a bisect session (JSON)
KV_REMOTE_INDEX = b"remote-idx:"  # + remote name + ":" + index key: a cached remote pack index
KV_EVAL = b"eval/"  # + tree id + "/" + spec hash: a cached evaluation result (JSON)
KV_STATS = b"\x00stats"  # object count and stored bytes (u64 pair), kept by the LMDB backend

# -- keys of .mvc/config.json -----------------------------------------------------------------
CFG_FORMAT = "format"  # int: the repository format version
CFG_REMOTES = "remotes"  # {name: {"url": ..., "endpoint_url": ...}}
CFG_LAZY = "lazy"  # name of the remote a lazy clone fetches missing chunks from
CFG_EVAL = "eval"  # the default evaluation ({"ppl": TEXT, "tokens": N, ...} or {"cmd": ...})
CFG_CALIB = "calib"  # the default calibration text ({"text": TEXT, "tokens": N})
CFG_DELTA = "delta"  # delta coding of new chunks: {"max_depth": N} (0: store every chunk in full)

# -- ref namespaces ---------------------------------------------------------------------------
HEAD = "HEAD"  # a commit id (detached) or "ref: refs/heads/<branch>"
HEADS = "refs/heads/"  # branches
TAGS = "refs/tags/"  # tags
REMOTES = "refs/remotes/"  # + remote + "/" + branch: where fetch last saw a remote's branches
ATTEMPTS = "refs/attempts/"  # + branch + "/" + n: compression waves a guard rejected
