"""sonde.ingest.runtime.btf: struct layouts from BTF, on a hand-built blob and on the running kernel."""
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import need
from sonde.ingest.runtime import btf
from sonde.ingest.errors import SondeError

pytestmark = [pytest.mark.hot_path]

# A tiny BTF blob, record by record (little-endian u32 words; a record is
# name_off, info = kind_flag << 31 | kind << 24 | vlen, size-or-type, then its extra).
BLOB = bytes.fromhex(
    # header: magic eb9f, version 1, flags 0, hdr_len 24, type_off 0, type_len 332,
    # str_off 332, str_len 84
    "9feb0100 18000000 00000000 4c010000 4c010000 54000000"
    # [1] INT 'int' size 4, encoding: 32 bits
    "01000000 00000001 04000000 20000000"
    # [2] STRUCT 'inner' size 8: a [1] @0 bits, b [1] @32
    "05000000 02000004 08000000 0b000000 01000000 00000000 0d000000 01000000 20000000"
    # [3] UNION (anonymous) size 8: u1 [1] @0, s [2] @0
    "00000000 02000005 08000000 0f000000 01000000 00000000 12000000 02000000 00000000"
    # [4] STRUCT 'outer' size 24, kind_flag (offsets carry bitfield sizes): x [1] @0;
    #     flag [1] 3 bits @32; (anonymous) [3] @64; nested [5] @128
    "14000000 04000084 18000000 1a000000 01000000 00000000 1c000000 01000000 20000003"
    "00000000 03000000 40000000 21000000 05000000 80000000"
    # [5] TYPEDEF 'inner_t' -> [2]
    "28000000 00000008 02000000"
    # [6] PTR -> [4]
    "00000000 00000002 04000000"
    # [7] ARRAY of [1], index type [1], 5 elements
    "00000000 00000003 00000000 01000000 01000000 05000000"
    # [8] STRUCT 'witharr' size 32: arr [7] @0, p [6] @192
    "30000000 02000004 20000000 38000000 07000000 00000000 3c000000 06000000 c0000000"
    # [9] ENUM 'flags' size 4: A = 0, B = 5
    "3e000000 02000006 04000000 44000000 00000000 46000000 05000000"
    # [10] FUNC_PROTO returning void, parameters (unnamed): [11], [6], [1]
    "00000000 0300000d 00000000 00000000 0b000000 00000000 06000000 00000000 01000000"
    # [11] PTR -> void
    "00000000 00000002 00000000"
    # [12] TYPEDEF 'btf_trace_x' -> [13] (how the kernel describes raw tracepoint x)
    "48000000 00000008 0d000000"
    # [13] PTR -> [10]
    "00000000 00000002 0a000000"
) + b"\0int\0inner\0a\0b\0u1\0s\0outer\0x\0flag\0nested\0inner_t\0witharr\0arr\0p\0flags\0A\0B\0btf_trace_x\0"


def test_offsets_on_a_hand_built_blob():
    b = btf.BTF.parse(BLOB, "blob")
    assert b.offsetof("inner", "b") == 4
    assert b.offsetof("outer", "x") == 0
    # through the anonymous union, as C spells it, and on into a named struct in it
    assert b.offsetof("outer", "u1") == 8
    assert b.offsetof("outer", "s.b") == 12
    # through a typedef'd struct member
    assert b.offsetof("outer", "nested.a") == 16
    assert b.offsetof("outer", "nested.b") == 20
    assert b.offsetof("witharr", "p") == 24
    assert b.member("witharr", "arr").size == 20
    assert b.member("witharr", "p").size == 8
    assert b.member("outer", "nested").size == 8
    assert [b.sizeof(t) for t in ("int", "inner", "outer", "inner_t", "witharr")] == [4, 8, 24, 8, 32]


def test_enums_and_raw_tracepoint_args_on_a_hand_built_blob():
    b = btf.BTF.parse(BLOB, "blob")
    assert (b.enum_value("A"), b.enum_value("B")) == (0, 5)
    assert b.has_enum_value("B") and not b.has_enum_value("C")
    with pytest.raises(btf.BTFError, match="no enumerator C"):
        b.enum_value("C")
    # the first parameter (the tracepoint's private data) is not passed to the program
    assert b.raw_tracepoint_args("x") == ["struct outer *", "int"]
    with pytest.raises(btf.BTFError, match="no raw tracepoint y"):
        b.raw_tracepoint_args("y")


def test_has_member_and_refusals_on_a_hand_built_blob():
    b = btf.BTF.parse(BLOB, "blob")
    assert b.has_member("outer", "s.a")
    assert b.has_member("outer", "flag")  # a bitfield exists, it just has no byte offset
    assert not b.has_member("outer", "nope")
    assert not b.has_member("outer", "x.y")  # x is an int
    assert not b.has_member("nosuch", "x")
    with pytest.raises(btf.BTFError, match=r"outer\.flag is a bitfield"):
        b.offsetof("outer", "flag")
    with pytest.raises(btf.BTFError, match="struct outer has no member nope"):
        b.offsetof("outer", "nope")
    with pytest.raises(btf.BTFError, match="no struct nosuch"):
        b.offsetof("nosuch", "x")
    with pytest.raises(btf.BTFError, match="outer.x is not a struct or union"):
        b.offsetof("outer", "x.y")
    with pytest.raises(btf.BTFError, match="no type nosuch"):
        b.sizeof("nosuch")
    with pytest.raises(btf.BTFError, match="not BTF"):
        btf.BTF.parse(b"\0" * 32, "junk")
    with pytest.raises(btf.BTFError, match="truncated"):
        btf.BTF.parse(BLOB[:100], "short")


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(btf.BTFError) as e:
        btf.load(tmp_path)
    assert isinstance(e.value, SondeError)
    assert "\n" not in str(e.value) and "CONFIG_DEBUG_INFO_BTF" in str(e.value)


def real_kernel() -> btf.BTF:
    need(Path("/sys/kernel/btf/vmlinux").exists(), "the kernel has no BTF at /sys/kernel/btf/vmlinux")
    return btf.load("/sys")


def bpftool_members(struct_name: str) -> dict[str, int]:
    """Named members' bit offsets, as Debian's bpftool prints them (an independent reader)."""
    need(shutil.which("bpftool") is not None, "bpftool (Debian package) not installed")
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(rf"^\[\d+\] STRUCT '{struct_name}' size=\d+ vlen=\d+\n((?:\t.*\n)*)", out, re.M)
    assert m, f"bpftool shows no struct {struct_name}"
    return {name: int(bits) for name, bits in re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", m.group(1))}


def test_real_kernel_matches_bpftool():
    b = real_kernel()
    for struct_name, members in (("request", ("q", "cmd_flags", "__data_len", "__sector", "part",
                                              "start_time_ns", "io_start_time_ns")),
                                 ("sock_common", ("skc_cookie", "skc_family", "skc_state")),
                                 ("gendisk", ("major", "first_minor", "part0"))):
        theirs = bpftool_members(struct_name)
        for name in members:
            assert b.offsetof(struct_name, name) * 8 == theirs[name], (struct_name, name)
    # a path through a nested struct: sock embeds sock_common as __sk_common at 0
    assert b.offsetof("sock", "__sk_common.skc_cookie") == b.offsetof("sock_common", "skc_cookie")
    assert b.sizeof("u64") == 8 and b.member("request", "start_time_ns").size == 8
    assert b.raw_tracepoint_args("block_rq_complete") == ["struct request *", "blk_status_t", "unsigned int"]
    assert b.enum_value("REQ_OP_WRITE") == 1


def test_real_kernel_parse_is_fast_and_cached():
    real_kernel()
    started = time.perf_counter()
    fresh = btf.BTF.parse(Path("/sys/kernel/btf/vmlinux").read_bytes())
    assert time.perf_counter() - started < 1.0  # ~0.1 s here; generous for a loaded CI host
    assert fresh.offsetof("request", "start_time_ns") == btf.offsetof("request", "start_time_ns")
    assert btf.load("/sys") is btf.load(Path("/sys"))
