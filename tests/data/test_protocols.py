import pytest

from avatar.data.protocols import FrameRange, get_protocol


def test_zju_monocular():
    p = get_protocol("zju_monocular")
    frames, cams = p.select("train", 1400, 23)
    assert len(frames) == 100 and frames[-1] == 495 and cams == (4,)
    frames, cams = p.select("test", 1400, 23)
    assert len(frames) == 17 and frames[-1] == 480 and len(cams) == 22 and 4 not in cams
    assert p.resolution == (512, 512) and p.background == "black"


def test_zju_3dgs_avatar_and_multiview():
    p = get_protocol("zju_3dgs_avatar")
    assert p.select("train", 1400, 23)[1] == (0,)
    frames, cams = p.select("test", 1400, 23)
    assert cams == tuple(range(1, 23)) and frames == tuple(range(0, 496, 30))
    m = get_protocol("zju_multiview")
    frames, cams = m.select("train", 1400, 23)
    assert len(cams) == 4 and frames == tuple(range(300))


@pytest.mark.parametrize("subject,n_train,n_test,step", [
    ("female-3-casual", 112, 51, 4), ("female-4-casual", 84, 48, 4), ("male-3-casual", 114, 55, 4),
    ("male-4-casual", 110, 36, 6)])
def test_peoplesnapshot(subject, n_train, n_test, step):
    p = get_protocol(f"peoplesnapshot/{subject}")
    train = p.split("train").frames.indices()
    test = p.split("test").frames.indices()
    assert (len(train), len(test)) == (n_train, n_test)
    assert train[1] - train[0] == step and p.resolution == (540, 540)


def test_for_subject_clip_and_scale():
    p = get_protocol("peoplesnapshot/male-4-casual")
    with pytest.raises(ValueError, match="mode='scale'"):
        p.for_subject(100, 1, mode="clip")  # the test range starts after the subject ends
    s = p.for_subject(100, 1, mode="scale")
    train, test = s.split("train").frames, s.split("test").frames
    assert train.last < test.first and test.last <= 99
    c = get_protocol("zju_monocular").for_subject(40, 6, mode="clip")
    assert c.select("train", 40, 6) == ((0, 5, 10, 15, 20, 25, 30, 35), (4,))
    with pytest.raises(ValueError, match="cameras"):
        get_protocol("zju_monocular").for_subject(40, 3)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("nope")
    with pytest.raises(ValueError, match="no split"):
        get_protocol("zju_monocular").split("novel_pose")
    with pytest.raises(ValueError):
        FrameRange(5, 2)
