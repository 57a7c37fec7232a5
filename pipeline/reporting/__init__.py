"""The study's comparison: tables, claims, the teacher-swap study, seed statistics, figures."""
