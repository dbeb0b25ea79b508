"""Study loaders: NIfTI, ACDC, DICOM, and the checks every loaded study goes through.

Public API::

    load_study(path, *, series=None) -> Study      # picks the loader from the path
    load_studies(paths, *, series=None, phase_names=None) -> Study  # one or several inputs
    load_nifti(path, *, labels=None, label_convention="project") -> Study
    load_acdc(folder) -> Study
    load_dicom(folder, *, series=None) -> Study
    validate_study(study) -> Study
    check_acquisition(study) -> Study              # cine short-axis stack? (see .acquisition)

Errors are :class:`~deeprecon.runtime.errors.DeepreconError` subclasses with an exit
code; the specific ones (``MixedSeriesError``, ``MissingSliceError``, ...) live in
:mod:`deeprecon.runtime.io.validate` and are re-exported here.
"""
from deeprecon.runtime.io.acquisition import (DynamicSeriesError, LongAxisError,
                                              SingleSliceError, check_acquisition)
from deeprecon.runtime.io.acdc import is_acdc_folder, load_acdc, parse_info_cfg
from deeprecon.runtime.io.dicom import load_dicom
from deeprecon.runtime.io.load import load_studies, load_study, phase_name_of
from deeprecon.runtime.io.nifti import find_label_file, load_nifti
from deeprecon.runtime.io.validate import (
    AmbiguousInputError, DuplicatePositionError, GeometryMismatchError, InvalidGeometryError,
    LabelError, MissingSliceError, MixedSeriesError, NoImagesError, NonFiniteError, NonMRError,
    NoStackError, OrientationMismatchError, PhaseCountMismatchError, UnknownSeriesError,
    UnreadableFilesError, UnsupportedTransferSyntaxError, validate_study)

__all__ = [
    "load_study", "load_studies", "phase_name_of", "load_nifti", "load_acdc", "load_dicom", "validate_study", "check_acquisition",
    "DynamicSeriesError", "LongAxisError", "SingleSliceError",
    "is_acdc_folder", "parse_info_cfg", "find_label_file",
    "AmbiguousInputError", "DuplicatePositionError", "GeometryMismatchError",
    "InvalidGeometryError", "LabelError",
    "MissingSliceError", "MixedSeriesError", "NoImagesError", "NonFiniteError", "NonMRError",
    "NoStackError", "OrientationMismatchError", "PhaseCountMismatchError", "UnknownSeriesError",
    "UnreadableFilesError", "UnsupportedTransferSyntaxError",
]
