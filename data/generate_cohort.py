"""Write a phantom CT -> CBCT cohort (NIfTI + manifest.tsv) for studies and demos.

    python data/generate_cohort.py OUT_DIR --patients 10 --shape 128 112 48
    python data/generate_cohort.py OUT_DIR --dicom      # also pNN/ct/, pNN/cbct/ and their RTSTRUCTs

With --dicom, each patient can be registered as a clinic would, or all of them as a study:
    inrlddmm register --moving OUT_DIR/p01/ct --fixed OUT_DIR/p01/cbct \
        --moving-rtstruct OUT_DIR/p01/ct_rtstruct.dcm --fixed-rtstruct OUT_DIR/p01/cbct_rtstruct.dcm --out-dir OUT
    inrlddmm study OUT_DIR/dicom_manifest.tsv --out-dir OUT --work-dir WORK
"""

import argparse

from nipype_inrlddmm.phantom import write_cohort


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write (created)")
    parser.add_argument("--patients", type=int, default=3, help="number of patients (default 3)")
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 112, 48), help="grid (default 128 112 48)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first patient (default 0)")
    parser.add_argument("--dicom", action="store_true", help="also write per patient the CT and CBCT as DICOM series "
                        "(ct/, cbct/) with an RTSTRUCT of the labels on each (ct_rtstruct.dcm, cbct_rtstruct.dcm), "
                        "and dicom_manifest.tsv, the study manifest of them")
    args = parser.parse_args()
    print(write_cohort(args.out_dir, args.patients, shape=tuple(args.shape), seed=args.seed, dicom=args.dicom))


if __name__ == "__main__":
    main()
