"""`PlacementConfig.pinned`: a pinned model is placed on its device only (the fleet
file's `pinned`); without pins, placement is unchanged."""

from __future__ import annotations

from prism.serving.policies import (
    ComputeAwareConfig,
    ComputeAwarePlacement,
    DeviceInfo,
    KVPressurePlacement,
    Migration,
    ModelDemand,
    PlacementConfig,
)

GB = 1 << 30
DEVICES = [DeviceInfo("0", 80 * GB), DeviceInfo("1", 80 * GB)]


def _model(name: str, rate: float, weight_gb: int = 16) -> ModelDemand:
    return ModelDemand(name, weight_gb * GB, 128 << 10, rate, 0.05, 0.2)


def test_a_pinned_model_goes_to_its_device_and_the_others_around_it() -> None:
    models = [_model("a", 100.0), _model("b", 90.0)]
    assert KVPressurePlacement().place(models, DEVICES).assignment == {"a": "0", "b": "1"}
    pinned = KVPressurePlacement(PlacementConfig(pinned={"a": "1"}))
    assert pinned.place(models, DEVICES).assignment == {"a": "1", "b": "0"}


def test_a_pinned_model_is_never_migrated() -> None:
    """a, busy alone on the smaller device 1, would move to device 0 unpinned."""
    models = [_model("a", 2000.0)]
    devices = [DeviceInfo("0", 80 * GB), DeviceInfo("1", 40 * GB)]
    current = {"a": "1"}
    free = ComputeAwarePlacement(ComputeAwareConfig(min_residence_s=0))
    assert free.place(models, devices, current).migrations == [Migration("a", "1", "0")]
    config = ComputeAwareConfig(pinned={"a": "1"}, min_residence_s=0)
    pinned = ComputeAwarePlacement(config).place(models, devices, current)
    assert pinned.migrations == [] and pinned.assignment == current


def test_a_pinned_model_that_does_not_fit_its_device_is_unplaced() -> None:
    models = [_model("big", 1.0, weight_gb=100)]
    devices = [DeviceInfo("0", 80 * GB), DeviceInfo("1", 120 * GB)]
    placement = KVPressurePlacement(PlacementConfig(pinned={"big": "0"})).place(models, devices)
    assert placement.unplaced == ["big"] and placement.assignment == {}
