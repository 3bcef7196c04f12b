"""The profile loader: a real profile round-trips; every kind of damage is one clear error naming the field."""

from __future__ import annotations

import json

import pytest

from toolkit.errors import ProfileError
from toolkit.models import load_model
from toolkit.profile_format import load_profile, save_profile


@pytest.fixture
def saved(lenet_profile, tmp_path):
    profile, _ = lenet_profile
    path = tmp_path / "p.json"
    save_profile(profile, path)
    return path


def _damage(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_round_trip_is_lossless(lenet_profile, saved) -> None:
    profile, _ = lenet_profile
    assert load_profile(saved) == profile


def test_expected_model_is_accepted(saved) -> None:
    load_profile(saved, expect_fingerprint=load_model("lenet5").fingerprint())


def test_profile_of_another_model_is_refused(saved) -> None:
    with pytest.raises(ProfileError, match=r"model\.fingerprint .* another model"):
        load_profile(saved, expect_fingerprint=load_model("vgg").fingerprint())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=2), "field version is 2; this cpsl-edge reads version 1"),
        (lambda d: d.update(format="something"), "field format"),
        (lambda d: d["device"].pop("board"), r"field device\.board: Field required"),
        (lambda d: d["cuts"][2].update(smashed_bytes_per_sample=-4), r"field cuts\[2\]\.smashed_bytes_per_sample"),
        (lambda d: d["layers"][0]["batches"][0]["forward_s"].update(median=-1.0), r"layers\[0\]\.batches\[0\]"),
        (lambda d: d["full_model"].update(param_bytes="many"), r"field full_model\.param_bytes"),
        (lambda d: d["layers"][3].update(name="renamed"), "layers do not match"),
        (lambda d: d["cuts"][0].update(cut=40), "outside"),
        (lambda d: d.update(surprise=1), "surprise: Extra inputs"),
    ],
)
def test_damaged_profiles_name_the_field(saved, edit, message) -> None:
    _damage(saved, edit)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(saved)
    assert "\n" not in str(info.value) and str(saved) in str(info.value)


def test_non_finite_numbers_are_refused(saved) -> None:
    text = saved.read_text()
    data = json.loads(text)
    data["backward_call_overhead_s"] = "NaN-placeholder"
    saved.write_text(json.dumps(data).replace('"NaN-placeholder"', "NaN"))
    with pytest.raises(ProfileError, match="backward_call_overhead_s: Input should be a finite number"):
        load_profile(saved)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00binary", b"[1, 2]", b""])
def test_corrupt_files(tmp_path, content) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ProfileError, match=r"bad\.json"):
        load_profile(path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "absent.json")


def test_a_profile_path_that_never_ends_or_nests_without_end_is_one_error(tmp_path) -> None:
    with pytest.raises(ProfileError, match="is more than 4 MB: not a profile"):
        load_profile("/dev/zero")  # read up to the bound, not to the end of memory
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 10_000 + "]" * 10_000)
    with pytest.raises(ProfileError, match="nests"):
        load_profile(deep)
