"""Reading and writing data: image files, ROS image messages as NumPy, rosbag2 files, geotagged image sets."""
