"""A study's result as a DICOM Structured Report (TID 1500 Measurement Report, with highdicom).

One SR per study and model version, in a series of its own inside the source study:

- root: TID 1500 "Imaging Measurement Report"; procedure reported: SNOMED CT 399208008 "Plain
  chest X-ray"; observer: the device (cxr-screen, the model's name as its model name);
- one TID 1501 measurement group for the study: the study score as a measurement (DCM 122157
  "Probability", unit UCUM "1") of the finding the model scores (its positive class, e.g.
  "abnormal"), the model's decision at the checkpoint's threshold as a qualitative evaluation
  of that finding (SNOMED CT 10828004 "Positive" / 260385009 "Negative"), the algorithm
  identification (TID 4019: model name, version; parameters: checkpoint sha256, threshold,
  aggregation rule, preprocessing sha256), and every scored image as a source image;
- one group per scored image, with that image's own score, decision and source reference.

The finding (the model's positive class) has no standard code that fits every checkpoint: it
uses the private coding scheme ``99CXRSCREEN``, declared in the Coding Scheme Identification
Sequence as the standard asks.

UIDs are derived, not drawn: the series and SOP Instance UIDs are name-based UUIDs (``2.25.``,
UUID version 5) of (study UID, model name, model version), so publishing the same study result
again produces the same SR identity and a PACS replaces (or keeps) it instead of storing a
second copy; another model version gets its own series.

Patient and study attributes come from ``evidence``: the source images' headers *as the PACS
holds them* (the caller asks the destination PACS), so the SR files into the right study with
the PACS's current demographics. Nothing here reads files, the database or the network.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SR_CLASSES = {COMPREHENSIVE_3D_SR: Comprehensive3DSR, COMPREHENSIVE_SR: ComprehensiveSR}

# A fixed namespace for the name-based UIDs of this tool's SRs (never change it: re-publishing
# relies on the same inputs giving the same UIDs).
UID_NAMESPACE = uuid.UUID("0b4f6f1e-6c0a-5d3e-9a57-6378722d7372")
SCHEME = "99CXRSCREEN"
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
POSITIVE = CodedConcept("10828004", "SCT", "Positive")
NEGATIVE = CodedConcept("260385009", "SCT", "Negative")
MANUFACTURER = "cxr-screen"
SERIES_DESCRIPTION_MAX = 64  # LO


class SRBuildError(ValueError):
    """The inputs cannot make a valid SR; the text names what is missing or inconsistent."""


@dataclass(frozen=True)
class ModelIdentity:
    """The model version a result came from (a ``models`` row)."""

    name: str
    version: str
    sha256: str
    threshold: float
    positive_class: str
    preprocessing_sha256: str | None = None


@dataclass(frozen=True)
class ImageResult:
    """One scored image of the study (a row of ``image_predictions`` with its instance)."""

    sop_instance_uid: str
    series_instance_uid: str
    score: float
    label: bool


@dataclass(frozen=True)
class StudyResult:
    """A study's aggregated result under one model version, and its scored images."""

    study_instance_uid: str
    score: float
    label: bool
    threshold: float
    aggregation: str
    images: tuple[ImageResult, ...]


@dataclass(frozen=True)
class SRIdentity:
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int


def sr_identity(study_instance_uid: str, model: ModelIdentity) -> SRIdentity:
    """The SR's series and instance UIDs (and series number) for a study and model version:
    the same inputs always give the same values."""
    key = f"{study_instance_uid.strip()}|{model.name}|{model.version}"
    series = uuid.uuid5(UID_NAMESPACE, f"series|{key}")
    instance = uuid.uuid5(UID_NAMESPACE, f"sr|{key}")
    number = 9000 + uuid.uuid5(UID_NAMESPACE, f"number|{model.name}|{model.version}").int % 1000
    return SRIdentity(f"2.25.{series.int}", f"2.25.{instance.int}", number)


def _derived_uid(kind: str, *parts: str) -> str:
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '|'.join((kind, *parts))).int}"


def build_sr(
    result: StudyResult,
    model: ModelIdentity,
    evidence: Sequence[Dataset],
    *,
    sop_class_uid: str = COMPREHENSIVE_3D_SR,
    institution_name: str | None = None,
    software_version: str = "cxr-screen",
) -> Dataset:
    """The SR (a pydicom ``Dataset``, explicit VR little endian) for ``result``.

    ``evidence``: the header of every image in ``result.images`` (SOP Class/Instance UIDs,
    Series/Study Instance UIDs and the patient and study attributes), as the PACS holds it.
    """
    if sop_class_uid not in SR_CLASSES:
        raise SRBuildError(
            f"SR SOP class {sop_class_uid!r} is not supported; use Comprehensive 3D SR "
            f"({COMPREHENSIVE_3D_SR}) or Comprehensive SR ({COMPREHENSIVE_SR})"
        )
    if not result.images:
        raise SRBuildError(f"study {result.study_instance_uid} has no scored image to report on")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence if "SOPInstanceUID" in ds}
    missing = [i.sop_instance_uid for i in result.images if i.sop_instance_uid not in by_uid]
    if missing:
        raise SRBuildError(
            f"{len(missing)} scored image(s) of study {result.study_instance_uid} are not in "
            f"the evidence (e.g. {missing[0]}): the PACS does not hold them"
        )
    sources = [by_uid[i.sop_instance_uid] for i in result.images]
    for ds in sources:
        if str(ds.get("StudyInstanceUID", "")) != result.study_instance_uid:
            raise SRBuildError(
                f"image {ds.SOPInstanceUID} belongs to study {ds.get('StudyInstanceUID')}, "
                f"not to {result.study_instance_uid}"
            )
        if "SOPClassUID" not in ds:
            raise SRBuildError(f"image {ds.SOPInstanceUID} has no SOP Class UID in the evidence")
    evidence_list = [_with_type2_defaults(ds) for ds in sources]

    algorithm = AlgorithmIdentification(
        name=model.name,
        version=model.version,
        manufacturer=MANUFACTURER,
        parameters=[
            f"checkpoint sha256 {model.sha256}",
            f"threshold {model.threshold:.6g}",
            f"study aggregation {result.aggregation}",
            *(
                [f"preprocessing sha256 {model.preprocessing_sha256}"]
                if model.preprocessing_sha256
                else []
            ),
        ],
    )
    finding = CodedConcept(
        model.positive_class[:16], SCHEME, f"{model.positive_class} (model class)"
    )
    key = f"{result.study_instance_uid}|{model.name}|{model.version}"
    groups = [
        _group(
            f"study result ({model.name} {model.version})",
            _derived_uid("tracking", key),
            result.score,
            result.label,
            [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in sources],
            algorithm,
            finding,
        )
    ]
    for image, ds in zip(result.images, sources, strict=True):
        groups.append(
            _group(
                f"image result {ds.SOPInstanceUID}"[:64],
                _derived_uid("tracking", key, image.sop_instance_uid),
                image.score,
                image.label,
                [(ds.SOPClassUID, ds.SOPInstanceUID)],
                algorithm,
                finding,
            )
        )
    identity = sr_identity(result.study_instance_uid, model)
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_derived_uid("device", model.name, model.version),
            name="cxr-screen",
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    sr_class = SR_CLASSES[sop_class_uid]
    description = f"AI result {model.name} {model.version}"[:SERIES_DESCRIPTION_MAX]
    sr = sr_class(
        evidence=evidence_list,
        content=report,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{model.name} {model.version}"[:64],
        software_versions=software_version[:64],
        institution_name=institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=description,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=SCHEME,
                name="cxr-screen model concepts",
                responsible_organization="cxr-screen",
            )
        ],
    )
    return sr


def _group(
    identifier: str,
    tracking_uid: str,
    score: float,
    label: bool,
    references: list[tuple[str, str]],
    algorithm: AlgorithmIdentification,
    finding: CodedConcept,
) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=[Measurement(name=PROBABILITY, value=round(float(score), 6), unit=NO_UNITS)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=finding, value=POSITIVE if label else NEGATIVE)
        ],
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=sop_class, referenced_sop_instance_uid=sop_uid
            )
            for sop_class, sop_uid in references
        ],
    )


# Patient and General Study attributes highdicom copies from the first evidence item: Type 2
# (present, may be empty) in the SR, so a PACS that did not return one gets an empty value.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _with_type2_defaults(ds: Dataset) -> Dataset:
    copy = Dataset()
    copy.update(ds)
    for keyword in _TYPE2:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
