"""The original OpenDelta's ``opendelta.utils`` modules, as thin aliases onto opendelta's own code."""
