"""Product tracking for the frames stage: lanes, per-frame product candidates, a multi-object
tracker per lane, and the counting line that captures each product once.

- :mod:`~defectflow.tracking.lanes`: a lane's region (rectangle or polygon), direction of travel
  and counting line, in frame pixels and on the downscaled motion grid.
- :mod:`~defectflow.tracking.candidates`: the running background (frozen inside tracked boxes, so a
  product that stops on the belt is not absorbed) and the foreground blobs of each frame, split
  where touching products form one blob.
- :mod:`~defectflow.tracking.tracker`: each lane's candidates go to a norfair tracker; a track is
  counted once, when its centre crosses the lane's counting line in the direction of travel.

Why norfair (the ``norfair-enough`` distribution, a maintained fork of tryolabs/norfair): it is the
tracking library that installs cleanly beside ``opencv-python-headless`` and numpy 2 (upstream
norfair 2.3.0 pins numpy < 2 and rich < 15; ``trackers``, which now holds supervision's ByteTrack,
and supervision <= 0.31.0 require ``opencv-python``, a second cv2 that overwrites the headless one;
supervision 0.31.2 no longer ships a tracker). It brings Kalman-filtered association on box IoU,
track birth delay and lost-track inertia; the product logic (blobs, splitting, lanes, the counting
line, the window) is ours. It runs on every ``frames.stride``-th frame: an update costs about as
much as decoding a 320 x 240 frame, and the crossing frame is interpolated between updates.
"""
from defectflow.tracking.candidates import BackgroundModel, Candidate, LengthEstimate, find_candidates
from defectflow.tracking.lanes import Lane, lanes_for_camera
from defectflow.tracking.tracker import Capture, LaneTracker

__all__ = ["BackgroundModel", "Candidate", "Capture", "Lane", "LaneTracker", "LengthEstimate",
           "find_candidates", "lanes_for_camera"]
