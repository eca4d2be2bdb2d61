"""A torch tensor over raw memory that Prism manages itself (host or CUDA).

Built through a DLPack capsule, so torch never inspects the pointer: that lets a tensor
span a reserved range whose pages are not all mapped yet. The tensor does not own the
memory; its `ElasticTensor` does, and must outlive it.
"""

from __future__ import annotations

import ctypes

import torch


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),  # NULL: the memory belongs to an ElasticTensor
    ]


_K_DL_CPU = 1
_K_DL_CUDA = 2
_K_DL_UINT = 1

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

# DLPack structs handed to torch must stay alive as long as torch may read them; they
# are tiny, so they are kept for the life of the process.
_keep_alive: list[object] = []


def bytes_tensor(address: int, nbytes: int, device: str) -> torch.Tensor:
    """A 1-D uint8 tensor of `nbytes` at `address` on `device` ("cpu" or "cuda:N")."""
    dev = torch.device(device)
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = address
    if dev.type == "cuda":
        managed.dl_tensor.device = _DLDevice(_K_DL_CUDA, dev.index or 0)
    else:
        managed.dl_tensor.device = _DLDevice(_K_DL_CPU, 0)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(_K_DL_UINT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None
    managed.dl_tensor.byte_offset = 0
    managed.manager_ctx = None
    managed.deleter = None
    _keep_alive.append((managed, shape))
    capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    return torch.utils.dlpack.from_dlpack(capsule)


def typed_view(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """View the first bytes of a uint8 tensor as `shape` elements of `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for dim in shape:
        count *= dim
    return raw[: count * itemsize].view(dtype).view(shape)
