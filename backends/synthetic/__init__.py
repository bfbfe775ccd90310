"""An emulated NVIDIA Grace GPU (GH200 / GB200 / GB300) as the host sees it."""

from backends.synthetic.device import SyntheticGpu
from backends.synthetic.memory import BackingFileError
from backends.synthetic.profiles import PROFILES, Architecture, Profile, get_profile

__all__ = ["PROFILES", "Architecture", "BackingFileError", "Profile", "SyntheticGpu", "get_profile"]
