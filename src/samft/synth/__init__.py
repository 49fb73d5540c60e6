"""Insert real hemorrhage shapes into a head CT: a semi-synthetic ICH data set in the users' format.

``python -m samft.synth --ct scan.nii.gz --masks masks/ --out data/ [--val-masks val/]``

Each mask's lesion (its non-zero voxels, all components together) is moved into the scan by physical
size: sampled through both affines onto the CT grid (a partial-volume occupancy per CT voxel), randomly
flipped, rotated (at most 15 degrees) and placed so that every lesion voxel lies inside the scan's brain
parenchyma (``brain_mask``). The written mask is the ``K`` voxels of highest occupancy, ``K`` = the source
volume over the CT voxel volume, so it keeps the lesion's volume in ml to within half a CT voxel. The
lesion is painted at blood density (one HU per lesion, uniform in 50-90) with the occupancy, blurred by the
scanner's point spread, as mixing weight, and noise shaped like the scan's (``estimate_noise``) tops the
noise up where the scan's own noise was mixed away. Every output volume, negatives included, is the scan
with a small in-plane shift and extra scanner-like noise, so that shift and noise do not tell the classes
apart.

Output (as ``samft.data.demo`` writes it): ``{split}.csv`` (``path,ich,patient_id``; one patient per
volume, its stem), ``volumes/{stem}.pkl`` (``{"image": int16 HU, "affine": 4 x 4}``), ``masks/{stem}.nii.gz``
(uint8 {0,1}, the CT's affine; empty for negatives) and ``{split}_lesions.csv`` (per mask: placement,
volumes, blood HU, or why it was skipped). A volume's random draws come from ``SeedSequence([seed,
crc32(stem)])`` (the shared noise fields from the seed alone), so it does not depend on the other masks given.

Modules, in the order of the work: ``brain`` (parenchyma mask), ``noise`` (scanner noise model), ``scan``
(the CT read and prepared once), ``placement`` (a lesion's occupancy, orientation and place), ``render`` (one
output volume), ``dataset`` (a split's files and CSVs) and ``cli``.
"""

from samft.synth.brain import brain_mask
from samft.synth.dataset import insert_lesions
from samft.synth.noise import NoiseModel, estimate_noise
from samft.synth.scan import load_scan

__all__ = ["NoiseModel", "brain_mask", "estimate_noise", "insert_lesions", "load_scan"]
