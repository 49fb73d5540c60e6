"""samft: fine-tune SAM-Med3D for intracerebral hemorrhage segmentation on brain CT."""

__version__ = "0.1.0"
