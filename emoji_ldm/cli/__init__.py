"""The `emoji-ldm` command: the command table (`commands`), flags from config dataclasses (`options`), the entry
point (`main`), and Ray Jobs submission to a cluster (`submit`: `emoji-ldm submit` and `emoji-ldm jobs`)."""
