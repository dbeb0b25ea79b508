"""Study loaders: NIfTI, ACDC, DICOM."""
