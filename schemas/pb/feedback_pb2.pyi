from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Thumbs(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMBS_UNSPECIFIED: _ClassVar[Thumbs]
    THUMBS_UP: _ClassVar[Thumbs]
    THUMBS_DOWN: _ClassVar[Thumbs]
THUMBS_UNSPECIFIED: Thumbs
THUMBS_UP: Thumbs
THUMBS_DOWN: Thumbs

class Preference(_message.Message):
    __slots__ = ("preferred_id", "other_id")
    PREFERRED_ID_FIELD_NUMBER: _ClassVar[int]
    OTHER_ID_FIELD_NUMBER: _ClassVar[int]
    preferred_id: str
    other_id: str
    def __init__(self, preferred_id: _Optional[str] = ..., other_id: _Optional[str] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("target_id", "metric_name", "thumbs", "rating", "comment", "correction", "preference", "idempotency_key", "user")
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAME_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    target_id: str
    metric_name: str
    thumbs: Thumbs
    rating: float
    comment: str
    correction: str
    preference: Preference
    idempotency_key: str
    user: str
    def __init__(self, target_id: _Optional[str] = ..., metric_name: _Optional[str] = ..., thumbs: _Optional[_Union[Thumbs, str]] = ..., rating: _Optional[float] = ..., comment: _Optional[str] = ..., correction: _Optional[str] = ..., preference: _Optional[_Union[Preference, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("id", "replayed")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    id: str
    replayed: bool
    def __init__(self, id: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...
