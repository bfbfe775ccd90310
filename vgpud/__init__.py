"""vgpud: a userspace nvgrace-gpu VFIO variant driver serving a Grace GPU over vfio-user."""

__version__ = "0.1.0"
