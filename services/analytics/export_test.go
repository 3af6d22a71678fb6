package analytics

// SignStudyForTest lets attack tests sign a study with an arbitrary SVID.
var SignStudyForTest = signStudy
